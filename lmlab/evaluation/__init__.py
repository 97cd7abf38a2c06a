"""Using a trained model: evaluation methods (static, n-gram mixture, neural cache, dynamic evaluation; a registry) and
text generation."""
