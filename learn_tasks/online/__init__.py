"""Online serving: Feast features, the Milvus index, the model bundle and the recommendation API."""
