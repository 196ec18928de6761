"""hwtools: Persian chat fine-tuning and image captioning with one accelerate loop."""
