//! A session with one owner, and transactions that cannot leak.
//!
//! A [`Session`] is a connection that exactly one loop uses at a time (a checkout from the
//! [`super::manager::Manager`], returned to it when dropped). tokio-postgres pipelines the
//! requests of every task sharing a `Client`, so a statement sent by someone else between
//! `BEGIN` and `COMMIT` would run inside that transaction; an owned session rules that out.
//!
//! A [`Transaction`] borrows its session mutably (as tokio-postgres' own `Transaction` does), so
//! nothing else runs on the session while it is open. It starts with [`pool::BEGIN`] and ends
//! only with an explicit [`Transaction::commit`] or [`Transaction::rollback`]. The session
//! itself records that a transaction is open from the moment `BEGIN` is sent until `COMMIT` or
//! `ROLLBACK` was answered, so a transaction dropped half-way (an error path, a cancelled
//! future, a timeout, even `mem::forget`) leaves a session that knows it is dirty: the next
//! statement on it rolls back first, and the manager never hands a dirty session to anyone else
//! (it closes it, and the server rolls back; pgdog's pool guard does the same).

use std::time::Instant;

use tokio_postgres::{Client, Row};

use super::Error;
use super::manager::Home;
use super::pool::{self, Param};

/// A connection with one owner.
pub struct Session {
    /// Always present; taken only by `Drop`, to hand it back to the manager.
    client: Option<Client>,
    opened: Instant,
    /// `BEGIN` was sent and no `COMMIT`/`ROLLBACK` answered since.
    open_transaction: bool,
    /// The connection cannot be trusted any more (gone, timed out, or its owner said so).
    broken: bool,
    /// Where the session goes back when dropped; `None` for a session of its own.
    pub(super) home: Option<Home>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("open_transaction", &self.open_transaction)
            .field("broken", &self.broken)
            .field("closed", &self.c().is_closed())
            .finish()
    }
}

impl Session {
    /// A session that is closed when dropped (no manager).
    pub fn new(client: Client) -> Session {
        Session::with_opened(client, Instant::now())
    }

    pub(super) fn with_opened(client: Client, opened: Instant) -> Session {
        Session {
            client: Some(client),
            opened,
            open_transaction: false,
            broken: false,
            home: None,
        }
    }

    fn c(&self) -> &Client {
        self.client
            .as_ref()
            .expect("a session holds its client until dropped")
    }

    /// When the connection was opened.
    pub fn opened(&self) -> Instant {
        self.opened
    }

    /// True while a transaction was begun and not (yet) ended by the server's answer.
    pub fn in_transaction(&self) -> bool {
        self.open_transaction
    }

    /// True when the session can be given to its next owner.
    pub fn is_reusable(&self) -> bool {
        !self.broken && !self.open_transaction && !self.c().is_closed()
    }

    /// Closes the session instead of returning it to the manager (after an error that leaves
    /// its state unknown).
    pub fn discard(&mut self) {
        self.broken = true;
    }

    /// Records what a failed statement says about the connection.
    fn note<T>(&mut self, r: Result<T, Error>) -> Result<T, Error> {
        if let Err(e) = &r {
            if e.is_closed() || e.is_connect() || self.c().is_closed() {
                self.broken = true;
            }
        }
        r
    }

    /// Ends a transaction its owner left open, so the next statement starts clean.
    async fn settle(&mut self) -> Result<(), Error> {
        if self.broken {
            return Err(Error::Unusable);
        }
        if self.open_transaction {
            let r = pool::batch(
                self.c(),
                "rolling back an abandoned transaction",
                "ROLLBACK",
            )
            .await;
            if r.is_err() {
                self.broken = true;
            }
            r?;
            self.open_transaction = false;
        }
        Ok(())
    }

    /// The client, for statements outside a transaction that the caller wants to pipeline
    /// (several at once). Report a failure with [`Session::failed`].
    pub async fn client(&mut self) -> Result<&Client, Error> {
        self.settle().await?;
        Ok(self.c())
    }

    /// Reports a failure of a statement sent on [`Session::client`].
    pub fn failed(&mut self, e: &Error) {
        if e.is_closed() || e.is_connect() || self.c().is_closed() {
            self.broken = true;
        }
    }

    /// Rows of one statement, outside any transaction.
    pub async fn query(
        &mut self,
        what: &str,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Vec<Row>, Error> {
        self.settle().await?;
        let r = pool::query(self.c(), what, sql, params).await;
        self.note(r)
    }

    /// The one row of a statement that always returns one.
    pub async fn query_one(
        &mut self,
        what: &str,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Row, Error> {
        self.settle().await?;
        let r = pool::query_one(self.c(), what, sql, params).await;
        self.note(r)
    }

    /// Begins a transaction: [`pool::BEGIN`], one simple-protocol message.
    pub async fn begin(&mut self, what: &str) -> Result<Transaction<'_>, Error> {
        self.settle().await?;
        // Marked before the message can leave: if this future is dropped after sending it, the
        // session must still count as being in a transaction.
        self.open_transaction = true;
        let r = pool::batch(self.c(), &format!("starting {what}"), pool::BEGIN).await;
        self.note(r)?;
        Ok(Transaction {
            session: self,
            what: what.to_string(),
            failed: false,
        })
    }

    /// Begins a transaction and runs its first statement, sent together with `BEGIN` (one
    /// exchange with the server instead of two); the statement runs inside the transaction, after
    /// `BEGIN`'s settings. Its rows, and the transaction to go on with or commit.
    pub async fn begin_with(
        &mut self,
        name: &str,
        what: &str,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<(Transaction<'_>, Vec<Row>), Error> {
        self.settle().await?;
        self.open_transaction = true;
        let begun = format!("starting {name}");
        let (b, q) = futures_util::future::join(
            pool::batch(self.c(), &begun, pool::BEGIN),
            pool::query(self.c(), what, sql, params),
        )
        .await;
        if b.is_err() {
            // The statement's fate outside a transaction is unknown: nobody else may use the
            // session.
            self.broken = true;
        }
        self.note(b)?;
        let mut tx = Transaction {
            session: self,
            what: name.to_string(),
            failed: false,
        };
        let rows = tx.note(q)?;
        Ok((tx, rows))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(home) = self.home.take() {
            let reusable = self.is_reusable();
            if let Some(client) = self.client.take() {
                // Back to the manager only when it can serve someone else; else closed here.
                home.give_back(client, self.opened, reusable);
            }
        }
    }
}

/// An open transaction on a [`Session`]. Statements go through it; it ends only by
/// [`Transaction::commit`] or [`Transaction::rollback`]. Dropped while open, it leaves the
/// session marked, which is then rolled back or closed before any other use.
pub struct Transaction<'s> {
    session: &'s mut Session,
    what: String,
    /// A statement failed and was not undone by a rollback to a savepoint: the server has
    /// aborted the transaction, and COMMIT would only roll it back.
    failed: bool,
}

impl std::fmt::Debug for Transaction<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transaction")
            .field("what", &self.what)
            .field("failed", &self.failed)
            .finish()
    }
}

impl Transaction<'_> {
    fn note<T>(&mut self, r: Result<T, Error>) -> Result<T, Error> {
        if r.is_err() {
            self.failed = true;
        }
        self.session.note(r)
    }

    /// Rows of one statement in the transaction.
    pub async fn query(
        &mut self,
        what: &str,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Vec<Row>, Error> {
        let r = pool::query(self.session.c(), what, sql, params).await;
        self.note(r)
    }

    /// One statement whose rows do not matter; the affected row count.
    pub async fn execute(
        &mut self,
        what: &str,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<u64, Error> {
        let r = pool::execute(self.session.c(), what, sql, params).await;
        self.note(r)
    }

    /// Sets a savepoint, so that a failure after it can be undone alone.
    pub async fn savepoint(&mut self, name: &str) -> Result<(), Error> {
        let r = pool::batch(
            self.session.c(),
            &format!("setting savepoint {name}"),
            &format!("SAVEPOINT {name}"),
        )
        .await;
        self.note(r)
    }

    /// Undoes everything since the savepoint; the transaction can go on.
    pub async fn rollback_to(&mut self, name: &str) -> Result<(), Error> {
        let r = pool::batch(
            self.session.c(),
            &format!("rolling back to savepoint {name}"),
            &format!("ROLLBACK TO SAVEPOINT {name}"),
        )
        .await;
        let r = self.session.note(r);
        if r.is_ok() {
            self.failed = false;
        }
        r
    }

    /// Commits. After a failed statement the server would answer COMMIT by rolling back, so
    /// that case rolls back and says so instead of reporting success.
    pub async fn commit(mut self) -> Result<(), Error> {
        if self.failed {
            let what = std::mem::take(&mut self.what);
            self.rollback().await?;
            return Err(Error::Aborted { what });
        }
        let r = pool::batch(
            self.session.c(),
            &format!("committing {}", self.what),
            "COMMIT",
        )
        .await;
        self.session.note(r)?;
        self.session.open_transaction = false;
        Ok(())
    }

    /// Rolls back.
    pub async fn rollback(self) -> Result<(), Error> {
        let r = pool::batch(
            self.session.c(),
            &format!("rolling back {}", self.what),
            "ROLLBACK",
        )
        .await;
        self.session.note(r)?;
        self.session.open_transaction = false;
        Ok(())
    }
}
