import os

from celery import Celery

app = Celery(
    "shop", broker=os.environ.get("SHOP_BROKER_URL", "redis://localhost:6379/0"), include=["shop.tasks"]
)
app.conf.singleton_lock_backend = os.environ.get("SHOP_LOCK_URL", "redis://localhost:6379/1")
