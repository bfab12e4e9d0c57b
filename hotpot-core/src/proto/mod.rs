//! Protocol state machines and messages (sans-IO): the dispatcher's namespace and registry,
//! and the messages nodes, tools and the dispatcher exchange.

pub mod copies;
pub mod deciders;
pub mod dispatcher;
pub mod locks;
pub mod messages;
pub mod node;
pub mod outcome;
pub mod pins;
pub mod recent;
pub mod rejoin;
pub mod replication;
pub mod staged;
pub mod types;
pub mod unconfirmed;
pub mod versions;
