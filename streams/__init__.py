"""Identity enrichment for client analytics events, on Faust and Kafka, and offline."""

__version__ = "0.1.0"
