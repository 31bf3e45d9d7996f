"""What the pipeline hands to people: caption metrics (metrics), plots rendered offline (plots) and the Hub upload
(hub)."""
