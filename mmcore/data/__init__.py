"""Data: URL guard, sample corpus, ingest with img2dataset, filters, dataset versions, tokenizer."""
