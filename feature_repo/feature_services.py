"""Feast feature services, versioned like the models that read them.

A model version pins the feature service it was trained and served with; a change of features gets a
new service name (recommender_v2) so models already promoted keep reading what they expect.
"""
from feast import FeatureService

from feature_views import item_stats, user_activity, user_recent_items

recommender_v1 = FeatureService(
    name="recommender_v1",
    features=[user_recent_items, user_activity],
    description="What the recommendation service reads per request (user tower input + activity).",
)

item_stats_v1 = FeatureService(
    name="item_stats_v1",
    features=[item_stats],
    description="Item statistics: popularity, first seen, cold-start and long-tail flags.",
)
