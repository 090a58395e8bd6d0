"""The language-model kind (``kind.LanguageModels``): a transformers causal LM or a built-in model."""
