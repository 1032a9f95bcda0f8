"""The commands, one module each (the top floor): `modelzoo.cli` dispatches `modelzoo <command>` to their `main`."""
