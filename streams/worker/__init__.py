"""the Faust shell and the batch step."""
