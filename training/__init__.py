"""RCMed fine-tuning (import name ``rcmed_training``). It imports rcmed_engine; never the other way."""
