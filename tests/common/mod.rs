pub mod coll;
