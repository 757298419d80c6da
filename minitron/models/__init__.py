"""Model building and loading, attention choice, and parameter counting."""
