"""The command line's subcommands, one module each, on top of the library.

Everything that reads an `argparse.Namespace`, prints for a person or owns an exit code
lives here; nothing in the library imports this package (enforced by the import-linter
contract in pyproject.toml).
"""
