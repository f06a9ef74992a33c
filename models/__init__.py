"""What is trained or loaded: toy models, synthetic data, the SAE type and its file formats,
transformers language models as activation sources. Never imports `experiments`."""
