"""Using a trained model: evaluation methods (static, neural cache, dynamic evaluation; a registry) and
text generation."""
