"""The local web page: ask the base and each adapter side by side, and look at their training runs (`server`)."""

DEFAULT_HOST = "127.0.0.1"  # this machine only: whoever reaches the port runs the models
DEFAULT_PORT = 7860
