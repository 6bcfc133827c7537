-- How many partitions each namespace's order queue has (FLASHSALE_PARTITIONS),
-- recorded on first start so that every process of a deployment agrees;
-- `fsctl migrate --partitions K` changes it once every partition is drained.
CREATE TABLE IF NOT EXISTS queue_partitions (
    namespace  text    PRIMARY KEY,
    partitions integer NOT NULL CHECK (partitions BETWEEN 1 AND 64)
);
