SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;
SET default_tablespace = '';
SET default_table_access_method = heap;
CREATE TABLE public.events (
    job_id text NOT NULL COLLATE pg_catalog."C",
    seq integer NOT NULL,
    user_id text NOT NULL COLLATE pg_catalog."C",
    user_seq bigint NOT NULL,
    type text NOT NULL,
    record text NOT NULL
);
CREATE TABLE public.jobs (
    id text NOT NULL COLLATE pg_catalog."C",
    user_id text NOT NULL COLLATE pg_catalog."C",
    kind text NOT NULL COLLATE pg_catalog."C",
    state text NOT NULL,
    attempt integer NOT NULL,
    last_heartbeat_at double precision,
    record text NOT NULL,
    finished_at double precision
);
CREATE TABLE public.meta (
    key text NOT NULL,
    value text
);
CREATE TABLE public.owners (
    lock bigint NOT NULL,
    pid integer,
    host text,
    since text,
    session integer,
    instance text
);
CREATE TABLE public.user_heads (
    user_id text NOT NULL COLLATE pg_catalog."C",
    head bigint NOT NULL,
    horizon bigint NOT NULL
);
INSERT INTO public.events VALUES ('01M8KS27KV3BZ9G2J4NCMB4X4D', 1, 'alice', 1, 'created', '{"job_id":"01M8KS27KV3BZ9G2J4NCMB4X4D","user_id":"alice","seq":1,"type":"created","state":"created","at":1795960151.67531,"data":{"kind":"ok","input":{"x":1}},"actor":null,"user_seq":1}');
INSERT INTO public.events VALUES ('01M8KS27KV3BZ9G2J4NCMB4X4D', 2, 'alice', 2, 'started', '{"job_id":"01M8KS27KV3BZ9G2J4NCMB4X4D","user_id":"alice","seq":2,"type":"started","state":"running","at":1795960151.6909125,"data":{"attempt":1},"actor":null,"user_seq":2}');
INSERT INTO public.events VALUES ('01M8KS27KV3BZ9G2J4NCMB4X4D', 3, 'alice', 3, 'progress', '{"job_id":"01M8KS27KV3BZ9G2J4NCMB4X4D","user_id":"alice","seq":3,"type":"progress","state":"running","at":1795960151.6980493,"data":{"progress":50,"step":"half"},"actor":null,"user_seq":3}');
INSERT INTO public.events VALUES ('01M8KS27MHDGDQ1TK6J5Z0T6WD', 1, 'alice', 4, 'created', '{"job_id":"01M8KS27MHDGDQ1TK6J5Z0T6WD","user_id":"alice","seq":1,"type":"created","state":"created","at":1795960151.6979582,"data":{"kind":"boom","input":{"x":2}},"actor":null,"user_seq":4}');
INSERT INTO public.events VALUES ('01M8KS27MHDGDQ1TK6J5Z0T6WD', 2, 'alice', 5, 'started', '{"job_id":"01M8KS27MHDGDQ1TK6J5Z0T6WD","user_id":"alice","seq":2,"type":"started","state":"running","at":1795960151.7030895,"data":{"attempt":1},"actor":null,"user_seq":5}');
INSERT INTO public.events VALUES ('01M8KS27KV3BZ9G2J4NCMB4X4D', 4, 'alice', 6, 'completed', '{"job_id":"01M8KS27KV3BZ9G2J4NCMB4X4D","user_id":"alice","seq":4,"type":"completed","state":"completed","at":1795960151.7031426,"data":{"result":{"echo":{"x":1}}},"actor":null,"user_seq":6}');
INSERT INTO public.events VALUES ('01M8KS27MHDGDQ1TK6J5Z0T6WD', 3, 'alice', 7, 'failed', '{"job_id":"01M8KS27MHDGDQ1TK6J5Z0T6WD","user_id":"alice","seq":3,"type":"failed","state":"failed","at":1795960151.705344,"data":{"error":{"type":"ValueError","message":"boom"}},"actor":null,"user_seq":7}');
INSERT INTO public.events VALUES ('01M8KS27MS1CC04FKFED6CSBYQ', 1, 'bob', 1, 'created', '{"job_id":"01M8KS27MS1CC04FKFED6CSBYQ","user_id":"bob","seq":1,"type":"created","state":"created","at":1795960151.7052345,"data":{"kind":"steps","input":{"n":5,"hold_at":1}},"actor":null,"user_seq":1}');
INSERT INTO public.events VALUES ('01M8KS27MS1CC04FKFED6CSBYQ', 2, 'bob', 2, 'started', '{"job_id":"01M8KS27MS1CC04FKFED6CSBYQ","user_id":"bob","seq":2,"type":"started","state":"running","at":1795960151.709557,"data":{"attempt":1},"actor":null,"user_seq":2}');
INSERT INTO public.events VALUES ('01M8KS27MS1CC04FKFED6CSBYQ', 3, 'bob', 3, 'checkpoint', '{"job_id":"01M8KS27MS1CC04FKFED6CSBYQ","user_id":"bob","seq":3,"type":"checkpoint","state":"running","at":1795960151.7126694,"data":{"version":1,"size":7},"actor":null,"user_seq":3}');
INSERT INTO public.events VALUES ('01M8KS27N0RZSJVPRFS945KYTX', 1, 'bob', 4, 'created', '{"job_id":"01M8KS27N0RZSJVPRFS945KYTX","user_id":"bob","seq":1,"type":"created","state":"created","at":1795960151.7125783,"data":{"kind":"steps","input":{"n":5,"hold_at":2}},"actor":null,"user_seq":4}');
INSERT INTO public.events VALUES ('01M8KS27N0RZSJVPRFS945KYTX', 2, 'bob', 5, 'started', '{"job_id":"01M8KS27N0RZSJVPRFS945KYTX","user_id":"bob","seq":2,"type":"started","state":"running","at":1795960151.7155485,"data":{"attempt":1},"actor":null,"user_seq":5}');
INSERT INTO public.events VALUES ('01M8KS27MS1CC04FKFED6CSBYQ', 4, 'bob', 6, 'progress', '{"job_id":"01M8KS27MS1CC04FKFED6CSBYQ","user_id":"bob","seq":4,"type":"progress","state":"running","at":1795960151.7155812,"data":{"progress":20.0,"step":"step 1"},"actor":null,"user_seq":6}');
INSERT INTO public.events VALUES ('01M8KS27N0RZSJVPRFS945KYTX', 3, 'bob', 7, 'checkpoint', '{"job_id":"01M8KS27N0RZSJVPRFS945KYTX","user_id":"bob","seq":3,"type":"checkpoint","state":"running","at":1795960151.7182379,"data":{"version":1,"size":7},"actor":null,"user_seq":7}');
INSERT INTO public.events VALUES ('01M8KS27N6J86HDS8XNAHA2PNP', 1, 'carol', 1, 'created', '{"job_id":"01M8KS27N6J86HDS8XNAHA2PNP","user_id":"carol","seq":1,"type":"created","state":"created","at":1795960151.7181835,"data":{"kind":"steps","input":{"n":5,"hold_at":3}},"actor":null,"user_seq":1}');
INSERT INTO public.events VALUES ('01M8KS27N0RZSJVPRFS945KYTX', 4, 'bob', 8, 'progress', '{"job_id":"01M8KS27N0RZSJVPRFS945KYTX","user_id":"bob","seq":4,"type":"progress","state":"running","at":1795960151.720937,"data":{"progress":20.0,"step":"step 1"},"actor":null,"user_seq":8}');
INSERT INTO public.events VALUES ('01M8KS27N6J86HDS8XNAHA2PNP', 2, 'carol', 2, 'started', '{"job_id":"01M8KS27N6J86HDS8XNAHA2PNP","user_id":"carol","seq":2,"type":"started","state":"running","at":1795960151.7209713,"data":{"attempt":1},"actor":null,"user_seq":2}');
INSERT INTO public.events VALUES ('01M8KS27N0RZSJVPRFS945KYTX', 5, 'bob', 9, 'checkpoint', '{"job_id":"01M8KS27N0RZSJVPRFS945KYTX","user_id":"bob","seq":5,"type":"checkpoint","state":"running","at":1795960151.7227178,"data":{"version":2,"size":7},"actor":null,"user_seq":9}');
INSERT INTO public.events VALUES ('01M8KS27N6J86HDS8XNAHA2PNP', 3, 'carol', 3, 'checkpoint', '{"job_id":"01M8KS27N6J86HDS8XNAHA2PNP","user_id":"carol","seq":3,"type":"checkpoint","state":"running","at":1795960151.7227473,"data":{"version":1,"size":7},"actor":null,"user_seq":3}');
INSERT INTO public.events VALUES ('01M8KS27NA7F1CS4BMVSJCT4NF', 1, 'carol', 4, 'created', '{"job_id":"01M8KS27NA7F1CS4BMVSJCT4NF","user_id":"carol","seq":1,"type":"created","state":"created","at":1795960151.7228045,"data":{"kind":"ok","input":{"x":3}},"actor":null,"user_seq":4}');
INSERT INTO public.events VALUES ('01M8KS27N0RZSJVPRFS945KYTX', 6, 'bob', 10, 'progress', '{"job_id":"01M8KS27N0RZSJVPRFS945KYTX","user_id":"bob","seq":6,"type":"progress","state":"running","at":1795960151.7264924,"data":{"progress":40.0,"step":"step 2"},"actor":null,"user_seq":10}');
INSERT INTO public.events VALUES ('01M8KS27N6J86HDS8XNAHA2PNP', 4, 'carol', 5, 'progress', '{"job_id":"01M8KS27N6J86HDS8XNAHA2PNP","user_id":"carol","seq":4,"type":"progress","state":"running","at":1795960151.726524,"data":{"progress":20.0,"step":"step 1"},"actor":null,"user_seq":5}');
INSERT INTO public.events VALUES ('01M8KS27N6J86HDS8XNAHA2PNP', 5, 'carol', 6, 'checkpoint', '{"job_id":"01M8KS27N6J86HDS8XNAHA2PNP","user_id":"carol","seq":5,"type":"checkpoint","state":"running","at":1795960151.7719233,"data":{"version":2,"size":7},"actor":null,"user_seq":6}');
INSERT INTO public.events VALUES ('01M8KS27N6J86HDS8XNAHA2PNP', 6, 'carol', 7, 'progress', '{"job_id":"01M8KS27N6J86HDS8XNAHA2PNP","user_id":"carol","seq":6,"type":"progress","state":"running","at":1795960151.7800558,"data":{"progress":40.0,"step":"step 2"},"actor":null,"user_seq":7}');
INSERT INTO public.events VALUES ('01M8KS27N6J86HDS8XNAHA2PNP', 7, 'carol', 8, 'checkpoint', '{"job_id":"01M8KS27N6J86HDS8XNAHA2PNP","user_id":"carol","seq":7,"type":"checkpoint","state":"running","at":1795960151.781227,"data":{"version":3,"size":7},"actor":null,"user_seq":8}');
INSERT INTO public.events VALUES ('01M8KS27N6J86HDS8XNAHA2PNP', 8, 'carol', 9, 'progress', '{"job_id":"01M8KS27N6J86HDS8XNAHA2PNP","user_id":"carol","seq":8,"type":"progress","state":"running","at":1795960151.7890427,"data":{"progress":60.0,"step":"step 3"},"actor":null,"user_seq":9}');
INSERT INTO public.events VALUES ('01M8KS27MS1CC04FKFED6CSBYQ', 5, 'bob', 11, 'cancelled', '{"job_id":"01M8KS27MS1CC04FKFED6CSBYQ","user_id":"bob","seq":5,"type":"cancelled","state":"cancelled","at":1795960151.7940402,"data":{},"actor":"bob","user_seq":11}');
INSERT INTO public.events VALUES ('01M8KS27N0RZSJVPRFS945KYTX', 7, 'bob', 12, 'paused', '{"job_id":"01M8KS27N0RZSJVPRFS945KYTX","user_id":"bob","seq":7,"type":"paused","state":"paused","at":1795960152.300237,"data":{"reason":"user","checkpoint_version":2},"actor":"bob","user_seq":12}');
INSERT INTO public.jobs VALUES ('01M8KS27N0RZSJVPRFS945KYTX', 'bob', 'steps', 'paused', 1, 1795960151.7264924, '{"id":"01M8KS27N0RZSJVPRFS945KYTX","user_id":"bob","kind":"steps","state":"paused","input":{"n":5,"hold_at":2},"created_at":1795960151.7125783,"updated_at":1795960152.300237,"progress":40.0,"step":"step 2","result":null,"error":null,"checkpoint":{"i":2},"checkpoint_version":2,"checkpoint_at":1795960151.7227178,"attempt":1,"recovery_attempts":0,"pause_reason":"user","started_at":1795960151.7155485,"completed_at":null,"failed_at":null,"last_heartbeat_at":1795960151.7264924,"seq":7,"run_seconds":0.5846884250640869,"run_started_at":null,"schema_version":1}', NULL);
INSERT INTO public.jobs VALUES ('01M8KS27KV3BZ9G2J4NCMB4X4D', 'alice', 'ok', 'completed', 1, 1795960151.6980493, '{"id":"01M8KS27KV3BZ9G2J4NCMB4X4D","user_id":"alice","kind":"ok","state":"completed","input":{"x":1},"created_at":1795960151.67531,"updated_at":1795960151.7031426,"progress":100.0,"step":"half","result":{"echo":{"x":1}},"error":null,"checkpoint":null,"checkpoint_version":0,"checkpoint_at":null,"attempt":1,"recovery_attempts":0,"pause_reason":null,"started_at":1795960151.6909125,"completed_at":1795960151.7031426,"failed_at":null,"last_heartbeat_at":1795960151.6980493,"seq":4,"run_seconds":0.012230157852172852,"run_started_at":null,"schema_version":1}', 1795960151.7031426);
INSERT INTO public.jobs VALUES ('01M8KS27MHDGDQ1TK6J5Z0T6WD', 'alice', 'boom', 'failed', 1, 1795960151.7030895, '{"id":"01M8KS27MHDGDQ1TK6J5Z0T6WD","user_id":"alice","kind":"boom","state":"failed","input":{"x":2},"created_at":1795960151.6979582,"updated_at":1795960151.705344,"progress":0.0,"step":null,"result":null,"error":{"type":"ValueError","message":"boom"},"checkpoint":null,"checkpoint_version":0,"checkpoint_at":null,"attempt":1,"recovery_attempts":0,"pause_reason":null,"started_at":1795960151.7030895,"completed_at":null,"failed_at":1795960151.705344,"last_heartbeat_at":1795960151.7030895,"seq":3,"run_seconds":0.002254486083984375,"run_started_at":null,"schema_version":1}', 1795960151.705344);
INSERT INTO public.jobs VALUES ('01M8KS27N6J86HDS8XNAHA2PNP', 'carol', 'steps', 'running', 1, 1795960151.7890427, '{"id":"01M8KS27N6J86HDS8XNAHA2PNP","user_id":"carol","kind":"steps","state":"running","input":{"n":5,"hold_at":3},"created_at":1795960151.7181835,"updated_at":1795960151.7890427,"progress":60.0,"step":"step 3","result":null,"error":null,"checkpoint":{"i":3},"checkpoint_version":3,"checkpoint_at":1795960151.781227,"attempt":1,"recovery_attempts":0,"pause_reason":null,"started_at":1795960151.7209713,"completed_at":null,"failed_at":null,"last_heartbeat_at":1795960151.7890427,"seq":8,"run_seconds":0.0,"run_started_at":1795960151.7209713,"schema_version":1}', NULL);
INSERT INTO public.jobs VALUES ('01M8KS27MS1CC04FKFED6CSBYQ', 'bob', 'steps', 'cancelled', 1, 1795960151.7155812, '{"id":"01M8KS27MS1CC04FKFED6CSBYQ","user_id":"bob","kind":"steps","state":"cancelled","input":{"n":5,"hold_at":1},"created_at":1795960151.7052345,"updated_at":1795960151.7940402,"progress":20.0,"step":"step 1","result":null,"error":null,"checkpoint":{"i":1},"checkpoint_version":1,"checkpoint_at":1795960151.7126694,"attempt":1,"recovery_attempts":0,"pause_reason":null,"started_at":1795960151.709557,"completed_at":null,"failed_at":null,"last_heartbeat_at":1795960151.7155812,"seq":5,"run_seconds":0.08448314666748047,"run_started_at":null,"schema_version":1}', 1795960151.7940402);
INSERT INTO public.jobs VALUES ('01M8KS27NA7F1CS4BMVSJCT4NF', 'carol', 'ok', 'created', 0, NULL, '{"id":"01M8KS27NA7F1CS4BMVSJCT4NF","user_id":"carol","kind":"ok","state":"created","input":{"x":3},"created_at":1795960151.7228045,"updated_at":1795960151.7228045,"progress":0.0,"step":null,"result":null,"error":null,"checkpoint":null,"checkpoint_version":0,"checkpoint_at":null,"attempt":0,"recovery_attempts":0,"pause_reason":null,"started_at":null,"completed_at":null,"failed_at":null,"last_heartbeat_at":null,"seq":1,"run_seconds":0.0,"run_started_at":null,"schema_version":1}', NULL);
INSERT INTO public.meta VALUES ('schema_version', '2');
INSERT INTO public.meta VALUES ('epoch', '01M8KS27KMQW927VFSKVX2ZCQ7');
INSERT INTO public.owners VALUES (1785684595, 12560, 'vm', '2026-11-29T13:49:11+00:00', 12563, '01M8KS27FZ1AMHAPVTHP18Y3Q5');
ALTER TABLE ONLY public.events
    ADD CONSTRAINT events_pkey PRIMARY KEY (job_id, seq);
ALTER TABLE ONLY public.jobs
    ADD CONSTRAINT jobs_pkey PRIMARY KEY (id);
ALTER TABLE ONLY public.meta
    ADD CONSTRAINT meta_pkey PRIMARY KEY (key);
ALTER TABLE ONLY public.owners
    ADD CONSTRAINT owners_pkey PRIMARY KEY (lock);
ALTER TABLE ONLY public.user_heads
    ADD CONSTRAINT user_heads_pkey PRIMARY KEY (user_id);
CREATE UNIQUE INDEX events_by_user ON public.events USING btree (user_id, user_seq);
CREATE INDEX jobs_by_state ON public.jobs USING btree (state);
CREATE INDEX jobs_by_user ON public.jobs USING btree (user_id, id);
CREATE INDEX jobs_finished ON public.jobs USING btree (kind, finished_at, id) WHERE (finished_at IS NOT NULL);
