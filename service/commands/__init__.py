"""CLI subcommands, one module per stage; see service/cli.py."""
