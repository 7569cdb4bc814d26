"""Data: text sources in (sources, corpus), a tokenizer (tokenization), tokenized and packed blocks out (module:
DataModule, cached), batches for training and evaluation."""
