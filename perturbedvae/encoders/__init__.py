"""Cell encoders: adapter kinds selected by the YAML cards in adapters/."""
