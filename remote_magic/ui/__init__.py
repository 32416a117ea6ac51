"""What the user sees: widget panels or text, fed only by events (no transport code)."""
