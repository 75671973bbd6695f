"""Settings of a gradtx run: config/presets.py (a regular package, so no other installed `config`
can shadow it)."""
