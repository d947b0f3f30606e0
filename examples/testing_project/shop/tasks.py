from celery_singleton_lock import Retry, SingletonTask
from shop.celery import app


@app.task(base=SingletonTask, lock_key="report:{day}")
def rebuild_report(day):
    return f"report of {day}"


@app.task(base=SingletonTask, lock_key=("account_id",), on_contention=Retry(countdown=10, max_retries=2))
def sync_account(account_id, full=False):
    return {"account": account_id, "full": full}
