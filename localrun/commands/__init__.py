"""CLI commands, one module each; `registry.COMMANDS` lists what `localrun` exposes."""
