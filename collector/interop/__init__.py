"""Files for other memory-forensics tools, built from what an image knows of its own kernel."""
