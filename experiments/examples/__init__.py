"""Examples that subclass stagewise's modules; each trains through ``stagewise fit --model <class path>``."""
