//! The exchange round's steps, apart from its IO: what to ship ([`plan`]), what to apply of
//! what arrived ([`apply`]), and the runs, pages and halts that travel ([`Page`]).

pub mod apply;
mod page;
pub mod plan;

pub use self::page::{Halt, HaltReason, Page, Run, Streams};
