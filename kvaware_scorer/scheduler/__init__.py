"""The scheduler host: pluggy hooks, EndpointPickerConfig loading, the filter -> scorers -> picker pipeline."""
