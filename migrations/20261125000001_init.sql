-- Flash Sale Engine schema: the stock ledger and the order book.
-- Names and meanings are fixed: docs/api.md ("The ledger") describes them.

CREATE TABLE IF NOT EXISTS products (
    id             bigint  PRIMARY KEY,
    name           text    NOT NULL,
    stock          integer NOT NULL CHECK (stock >= 0),
    seeded_stock   integer NOT NULL CHECK (seeded_stock >= 0),
    max_per_order  integer NOT NULL DEFAULT 10 CHECK (max_per_order > 0),
    per_user_limit integer CHECK (per_user_limit > 0),
    lock_fence     bigint  NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS orders (
    idempotency_key text        PRIMARY KEY,
    user_id         text        NOT NULL,
    product_id      bigint      NOT NULL,
    quantity        integer     NOT NULL,
    status          text        NOT NULL CHECK (status IN ('confirmed', 'rejected')),
    reason          text,
    accepted_at     timestamptz NOT NULL,
    processed_at    timestamptz NOT NULL
);

-- Per-user limit checks and verify's per-product sums.
CREATE INDEX IF NOT EXISTS orders_product_user_confirmed
    ON orders (product_id, user_id) WHERE status = 'confirmed';
CREATE INDEX IF NOT EXISTS orders_product_status ON orders (product_id, status);
