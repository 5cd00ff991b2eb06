"""The ``cai`` commands, one module per command or command group, named for what it holds. Every module here
defines ``register(app)``, which adds its commands to the root app; ``cai.cli`` calls it for each module."""
