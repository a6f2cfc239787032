"""Task definitions: data, model and metrics of each entry script, behind the engine's Task protocol."""
