"""Placeholder: commands are added by their owners."""
COMMANDS = ()
