"""stagewise: callbacks."""
