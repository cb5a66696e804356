"""FX graph passes: find nodes, check preconditions, rewrite, record."""
