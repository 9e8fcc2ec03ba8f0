"""Fine-tuning tasks: sequence classification (single sentences and pairs) and BIO token classification
(NER): reading task files, encoding them for the model, and their metrics."""
