"""stagewise: datamodules."""
