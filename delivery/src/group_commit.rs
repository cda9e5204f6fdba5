//! Group commit: the writes of many concurrent attempts in one PostgreSQL statement.
//!
//! Each attempt submits its write and waits for it to be committed, exactly as if it had
//! written alone; a single writer task takes whatever has queued up while its previous batch
//! was committing and writes it as one batch. Under load that is one commit (one WAL flush)
//! for hundreds of attempts instead of one each; an idle service writes a lone item at once.

use std::future::Future;

use tokio::sync::{mpsc, oneshot};

/// A write waiting for its batch, and where its result goes.
type Pending<T> = (T, oneshot::Sender<Result<(), String>>);

/// Submits items to a writer task that writes them in batches of up to `max_batch`.
pub struct GroupCommit<T> {
    sender: mpsc::Sender<Pending<T>>,
}

impl<T> Clone for GroupCommit<T> {
    fn clone(&self) -> Self {
        GroupCommit { sender: self.sender.clone() }
    }
}

impl<T: Send + 'static> GroupCommit<T> {
    /// Starts the writer task. `write` gets each batch; its result is every item's result. The
    /// task ends when every `GroupCommit` handle is dropped.
    pub fn spawn<F, Fut>(max_batch: usize, write: F) -> GroupCommit<T>
    where
        F: Fn(Vec<T>) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send,
    {
        let max_batch = max_batch.max(1);
        let (sender, mut receiver) = mpsc::channel::<Pending<T>>(max_batch * 4);
        tokio::spawn(async move {
            let mut pending: Vec<Pending<T>> = Vec::with_capacity(max_batch);
            while receiver.recv_many(&mut pending, max_batch).await > 0 {
                let (items, waiters): (Vec<T>, Vec<_>) = pending.drain(..).unzip();
                let result = write(items).await.map_err(|error| format!("{error:#}"));
                for waiter in waiters {
                    // A waiter that went away (its task was cancelled) needs no answer.
                    let _ = waiter.send(result.clone());
                }
            }
        });
        GroupCommit { sender }
    }

    /// Writes `item` with whatever else is waiting; returns once its batch is committed.
    pub async fn submit(&self, item: T) -> anyhow::Result<()> {
        let (done, result) = oneshot::channel();
        self.sender.send((item, done)).await.map_err(|_| anyhow::anyhow!("the group commit writer has stopped"))?;
        match result.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(anyhow::anyhow!(error)),
            Err(_) => Err(anyhow::anyhow!("the group commit writer has stopped")),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[tokio::test]
    async fn o5_every_item_is_written_once_and_answered_with_its_batchs_result() {
        let batches: Arc<Mutex<Vec<Vec<u32>>>> = Arc::default();
        let seen = batches.clone();
        let group = GroupCommit::spawn(8, move |items: Vec<u32>| {
            let seen = seen.clone();
            async move {
                let failed = items.contains(&13);
                seen.lock().unwrap().push(items);
                if failed { Err(anyhow::anyhow!("batch with 13 failed")) } else { Ok(()) }
            }
        });
        let results = futures::future::join_all((0..40u32).map(|item| {
            let group = group.clone();
            async move { (item, group.submit(item).await) }
        }))
        .await;
        let batches = batches.lock().unwrap().clone();
        let mut written: Vec<u32> = batches.iter().flatten().copied().collect();
        written.sort_unstable();
        assert_eq!(written, (0..40).collect::<Vec<_>>(), "each item written exactly once");
        assert!(batches.iter().all(|batch| batch.len() <= 8), "no batch above the limit");
        let failed_batch = batches.iter().find(|batch| batch.contains(&13)).unwrap();
        for (item, result) in results {
            assert_eq!(result.is_err(), failed_batch.contains(&item), "item {item}: its own batch's result");
        }
    }
}
