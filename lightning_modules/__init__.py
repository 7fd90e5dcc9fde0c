"""stagewise: lightning_modules."""
