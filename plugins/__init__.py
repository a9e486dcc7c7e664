"""Built-in plugins, installed as ``kvaware_scorer.plugins`` and found through the
``kvaware_scorer.plugins`` entry-point group like any third-party plugin."""
