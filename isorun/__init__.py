"""isorun: hardware-isolated microVM sandboxes for AI agents."""
