"""The `meshnode` command, its operator subcommands and the demo."""
