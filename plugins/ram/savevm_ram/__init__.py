"""savevm ram plugin."""
