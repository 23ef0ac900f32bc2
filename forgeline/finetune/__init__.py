"""OpenAI-compatible fine-tuning over forgeline: files, base models, jobs."""
