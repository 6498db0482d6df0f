"""The site runtime: connect, train, report."""
