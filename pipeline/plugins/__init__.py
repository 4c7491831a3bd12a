"""Built-in model plugins. They follow pipeline.plugin's contract like any third-party plugin."""
