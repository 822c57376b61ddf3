"""CLI subcommands, one module per stage; see service/likeness/cli/main.py."""
