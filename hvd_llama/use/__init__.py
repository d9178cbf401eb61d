"""Using a trained model: loading it for inference, and decoding."""
