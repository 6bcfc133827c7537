//! The API and the worker on the real PostgreSQL, Redis and RabbitMQ, one
//! test binary: the order path (`orders`), admission by stock tokens
//! (`admission`), faults of every backend and of
//! hostile input (`faults`), and the binary as an operator runs it (`process`).
#![allow(clippy::unwrap_used)]

mod admission;
mod faults;
mod orders;
mod partitions;
mod process;
