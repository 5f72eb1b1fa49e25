"""What each stage computes: text encoding, the denoising loop, VAE decode; models; weight loading.
May import ``parallel`` and ``comm``."""
